"""Weight sync from the trainer to the rollout engines: a plan computed once, bucketed transports, a
pipelined sender and a staging receiver.

Modules: ``registry`` (transport names, torch-free so the config can validate against it), ``plan``
(tensor order, buckets, dtype cast, tensor-parallel shards), ``transport`` (the ``WeightTransport``
interface and the link spec both ends build from), ``broadcast`` (torch.distributed sync group: gloo on
CPU, NCCL with a CTA cap on CUDA), ``store_transport`` (buckets through the transfer store),
``sender`` (trainer side, pipelined) and ``receiver`` (engine side, staging buffers).
"""
