"""dermedge model tooling: Derm-Foundation-shaped stand-ins, image sets, and the TFLite exporter."""
