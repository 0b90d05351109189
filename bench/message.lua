-- wrk script: a user message posted (POST /api/conversations/{id}/events) to the
-- conversations in $WRK_IDS (space-separated), round-robin; headers and the session key as
-- bench/post.lua (run from the repository's root).
dofile("bench/post.lua")
local ids = {}
for id in string.gmatch(os.getenv("WRK_IDS") or "", "%S+") do
  ids[#ids + 1] = id
end
local next_id = 0
local body = '{"action":"message","args":{"content":"through the bench"}}'
request = function()
  next_id = next_id % #ids + 1
  return wrk.format(nil, "/api/conversations/" .. ids[next_id] .. "/events", nil, body)
end
