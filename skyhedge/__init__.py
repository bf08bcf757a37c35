"""skyhedge: serve AI models on spot capacity spread over failure domains, through Terraform.

Public surface: the CLI (`skyhedge`), the spec loader, the policies and the planner. Everything
else is private and may move.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
