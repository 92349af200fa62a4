"""The cost model: what one training step costs at P ranks in each exchange mode, calibrated from what was measured
here and carried to clusters of thousands of ranks.

Collectives (Thakur, Rabenseifner & Gropp 2005; docs/design.md "The figures"), n bytes on P ranks:
    ring allreduce   2(P-1) a + 2((P-1)/P) n b + ((P-1)/P) n g
    ring allgather   (P-1) a + ((P-1)/P) n b                      (n: the total gathered bytes)
a (latency), b (seconds per byte moved) and g (seconds per byte reduced) are fitted by non-negative least squares,
in relative error, to the allreduce and allgather rows of `alure-bench comm` (`calibrate`).

One step of the slowest rank (`Model.step`), per mode:
    step = compute + sum over embedding tables of exchange(table) + allreduce(dense parameters) - overlap
    compute       data + forward + backward of the np=1 points, in proportion to the table lookups of the per-rank
                  batch, times the rank's share of a core when ranks outnumber cores (`cpu_factor`)
    exchange      network (a, b, g) + the CPU work each mode adds around it:
      sparse-gather   two allgathers (indices, values) of P x nnz rows; Horovod does not coalesce them (horovod issue
                      #3328), so building, adding and optimising the gathered gradient costs P x nnz x (4d + 8) bytes
      coalesced-gather  the same of P x distinct rows, after one pass over the rank's own rows to coalesce them
      dense-reduce    scatter-add into a kept V x d buffer, an allreduce of 4 V d bytes and a dense (fused) update of
                      the whole table
      sparse-as-dense to_dense, an allreduce of 4 V d bytes and to_sparse (horovod/torch/optimizer.py), whose
                      element-wise result (16 bytes of index per 4-byte value) the optimizer then walks
    overlap       up to `overlap` x backward of exchange time hides behind the backward pass (0 on a CPU-bound
                  machine: the exchange needs the cores the backward pass is using)
At np=1 Horovod exchanges nothing: the step is compute plus the optimizer on the rank's own rows.
The per-byte cost of the optimizer comes from the np=1 points; the per-byte cost of each mode's own CPU work around
its collectives is fitted to the sweep's multi-rank points (`fit_local_work`): comm does not see it.

Memory per rank (`Model.memory_bytes`): the np=1 peak RSS plus what each table's exchange keeps alive at its peak
(`table_memory_bytes`): sparse-gather EXCHANGE_COPIES x P x nnz x (4d + 8), growing with P; coalesced-gather the same
of the distinct rows plus the coalesced copy; dense-reduce the 4 V d buffer, flat in P; sparse-as-dense the dense copy
plus EXCHANGE_COPIES x the re-sparsified union of rows (20 bytes per element), growing with the rows any rank touched.
"""
