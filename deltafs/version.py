"""The package version, in a module of its own: ``format`` writes it into object metadata
and must not import the package root (which imports the API, which imports ``format``)."""
__version__ = "0.1.0"
