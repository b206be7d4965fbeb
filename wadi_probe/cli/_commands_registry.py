"""Imports every command module so that it registers on the app. One line per command module."""
