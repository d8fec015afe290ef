"""labrunner: hands-on labs for the Backend Engineering Roadmap, verified on real services."""

__version__ = "0.1.0"
