-- wrk script: GET with the session key in $WRK_KEY (none when empty).
local key = os.getenv("WRK_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["X-Session-API-Key"] = key
end
