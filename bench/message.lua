-- wrk script: a user message posted (POST /api/conversations/{id}/events) to the
-- conversations in $WRK_IDS, round-robin (bench/ids.lua).
dofile("bench/ids.lua")
local body = '{"action":"message","args":{"content":"through the bench"}}'
request = function()
  return wrk.format(nil, "/api/conversations/" .. next_id() .. "/events", nil, body)
end
