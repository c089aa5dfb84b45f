"""The science: graph, walks, compliance, model, generation, gate, LR schedule, batches and the epoch loop.

Plain numpy/torch: nothing here imports Ray or the records layer (tests/test_layout.py checks every module).
"""
