"""The config: typed schema, the rules a type cannot express, Hydra composition, resume history."""
