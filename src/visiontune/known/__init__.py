"""Known data sets: found locally or downloaded from their official address and verified."""
