"""Stage 1 of the data path: the model captured as an fx graph, its example and calibration inputs, the compressible
sites in it, and the graph edits every pass shares."""
