"""Generated from proto/kpg/v1 by scripts/gen.sh (make gen). Do not edit."""
