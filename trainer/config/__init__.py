"""The typed config: field schema and validation, the sections (one dataclass each), loading YAML
with dotted overrides, and the embedded default (`defaults/digits.yaml`)."""
