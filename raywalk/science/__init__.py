"""The science: graph, walks, compliance, model, generation, gate, LR schedule, batches and the epoch loop.

Plain numpy/torch: nothing here imports Ray or the records layer (tests/test_layering.py checks every module).
"""
