"""`casa serve`: an OpenAI-compatible chat endpoint and a live-captioning page
over one casa model (Starlette + uvicorn).

Modules, in the order they depend on each other:

    memory      the process's resident set; handing freed heap back when idle
    limits      every bound the operator sets; admission of sessions (429/503)
    media       the allowed media directory, image data URLs, video probing
    http        OpenAI error bodies, bounded bodies, event streams, disconnects
    guard       Host, Origin and API-key checks, security headers, 500 bodies
    connections how many connections, how long for headers (uvicorn's h11)
    engine      the model, and the one place that drives casa.inference
    state       what the routes share: engine, limits, workers, counters
    openai_api  /v1/models, /v1/chat/completions
    live        the page at /, one captioning session per viewer
    app         the Starlette app; running it with uvicorn (also in a thread)

Nothing is imported here, so `import casa.serve` stays cheap; the optional
dependencies (starlette, uvicorn) are needed only by `http`, `connections`,
`state` and the modules that use them.
"""
