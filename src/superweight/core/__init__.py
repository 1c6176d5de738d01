"""Core pieces every layer uses: architectures (arch), weight coordinates (coords), reversible model edits
(intervene) and the shared lower blocks of a teacher/student pass (prefix). No I/O, no measurements."""
