"""Measurements on a loaded model: metrics (NLL, PPL, KL, top-1, super activation) and their protocol,
generations, recovery, and a patch's geometry."""
