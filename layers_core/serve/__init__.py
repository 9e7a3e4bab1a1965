"""``layers-and-logits serve``: the live explorer. One process loads the model once; a page (the
HTML report's renderer) sends prompts; one worker thread that owns the model answers them
through a bounded queue (``worker``); the web app (``app``, Starlette under uvicorn) checks the
access token, bounds every input and never returns a traceback; ``explore`` turns a request
into the report's data or the files ``run`` writes."""
