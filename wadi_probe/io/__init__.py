"""Reading and writing files: checkpoint layouts and formats, LDM names, JSON and atomic writes."""
