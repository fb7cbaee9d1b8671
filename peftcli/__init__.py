"""peftcli: parameter-efficient fine-tuning from a YAML recipe, merged back with no latency."""

__version__ = "0.1.0"
