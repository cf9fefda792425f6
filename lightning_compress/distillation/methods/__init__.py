"""Distillation methods beyond the offline ``DistillationModule``, one module each: online (``mutual``), self
(``self_distillation``), adversarial and holistic structured (``adversarial``), cross-modal (``cross_modal``),
graph-based (``graph``), lifelong (``lifelong``, Learning without Forgetting), data-free (``deep_inversion``,
``data_free``), quantized teachers and students (``quantized``) and teacher-guided student search (``search``).
They override the public hooks of :class:`~lightning_compress.distillation.module.DistillationModule`."""
