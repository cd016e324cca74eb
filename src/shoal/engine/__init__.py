"""The embedded engine: real models from the package registry, in a supervised child."""
