"""Models: timm backbones (build), staged unfreezing (stages), and `best/` in timm's format (export)."""
