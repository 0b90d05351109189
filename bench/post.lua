-- wrk script: POST /api/conversations with an empty body (a new conversation per request),
-- with the session key in $WRK_KEY (none when empty).
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("WRK_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["X-Session-API-Key"] = key
end
