"""The version of lstmwatch: one place, read by the package, its run logs and its build."""

__version__ = "0.1.0"
