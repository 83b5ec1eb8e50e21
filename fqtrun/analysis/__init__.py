"""Analysis tools that need no trainer: BitOPs accounting, the precision range test."""
