"""fastclip: fast, exact per-example gradient clipping for differentially private training."""
