"""The package version (one place; the facade and patch-file manifests read it)."""
__version__ = "0.1.0"
