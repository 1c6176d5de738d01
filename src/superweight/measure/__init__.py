"""Measurements on a loaded model: metrics (NLL, PPL, KL, top-1, super activation) and their protocol,
generations, recovery, a patch's geometry, what a down-projection reads (inputs), and the analyses of a patch
(sparsity: the patch cut to k entries; views: tokens, neurons, where it writes, the scale sweep; sinks). Each
returns typed parts of the run record (schema/record.py)."""
