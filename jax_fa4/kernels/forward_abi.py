"""The forward launcher's argument convention, shared by the compile side
(forward.py, which imports cutlass) and the lowering side (which must not)."""

# (operand-or-result index, axis) of each int32 size argument, in launcher order:
# b, s_q, h_q from q (operand 0); s_k, h_k from k (operand 1).
SIZE_DIMS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2))
