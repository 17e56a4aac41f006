"""Command-line front-ends over the engine, the node and the bag tool: ``geodiff_predict`` (image files),
``geodiff_compile`` (ahead-of-time compiled engine packages) and ``geodiff_demo`` (the node on a recorded bag)."""
