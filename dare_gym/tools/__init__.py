"""What sits on top of training: the command line (``cli``), the OpenAI-compatible server (``serve``), benchmark
suites (``suite``), OpenCompass (``opencompass``) and fair algorithm comparisons (``compare``)."""
