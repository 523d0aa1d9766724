"""Spec -> plan. Importing this package is cheap: passes that need torch import it themselves."""
