-- wrk script: create-or-join (POST /api/conversations with a conversation_id) of the
-- conversations in $WRK_IDS, round-robin (bench/ids.lua).
dofile("bench/ids.lua")
request = function()
  return wrk.format(nil, nil, nil, '{"conversation_id":"' .. next_id() .. '"}')
end
