"""The test bed: tiny random models, the synthetic shapes task, the shipped `shapes-llava`, the demo.

Used by the tests, the benchmarks and the `fitprune-fx demo` command; the library itself
(backend, passes, fit, recipes, references) never imports it.
"""
