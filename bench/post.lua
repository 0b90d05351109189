-- wrk script: POST /api/conversations with an empty body (a new conversation per request).
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
