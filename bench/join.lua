-- wrk script: create-or-join (POST /api/conversations with a conversation_id) of the
-- conversations in $WRK_IDS (space-separated), round-robin; method, headers and the session
-- key as bench/post.lua (run from the repository's root).
dofile("bench/post.lua")
local ids = {}
for id in string.gmatch(os.getenv("WRK_IDS") or "", "%S+") do
  ids[#ids + 1] = id
end
local next_id = 0
request = function()
  next_id = next_id % #ids + 1
  return wrk.format(nil, nil, nil, '{"conversation_id":"' .. ids[next_id] .. '"}')
end
