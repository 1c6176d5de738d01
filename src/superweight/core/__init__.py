"""Core pieces every layer uses: architectures (arch), weight coordinates (coords), reversible model edits
(intervene), a loaded patch on a model (patching), the named conditions a stage measures (conditions) and the
shared lower blocks of a teacher/student pass (prefix). No I/O, no measurements."""
