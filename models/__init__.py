"""Model definitions (dgrun.models). The embedded default model ships here too."""
