-- Sourced by the wrk scripts that take turns over running conversations (run from the
-- repository's root): the ids in $WRK_IDS (space-separated), and next_id() to go round them;
-- method, headers and the session key as bench/post.lua.
dofile("bench/post.lua")
local ids = {}
for id in string.gmatch(os.getenv("WRK_IDS") or "", "%S+") do
  ids[#ids + 1] = id
end
local turn = 0
function next_id()
  turn = turn % #ids + 1
  return ids[turn]
end
