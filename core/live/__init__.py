"""The live model: hooks shared by threads (`hooks`), configurations compiled for it (`plan`), brick
interventions, sparse execution, adapter bricks and their training, side-by-side comparison and loss
evaluation."""
