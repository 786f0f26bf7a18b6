"""The package version, in a module of its own: every entry point and the HTTP API
read it without importing the package root."""

__version__ = "0.1.0"
