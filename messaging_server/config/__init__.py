"""The settings: options, environment, the configuration file."""
