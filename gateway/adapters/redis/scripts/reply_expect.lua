-- Record a request that awaits its reply. KEYS[1] pending hash; ARGV[1] timeout (ms), ARGV[2] reply TTL (ms),
-- ARGV[3] reply topic, ARGV[4] owner (a token of this request, so reply_forget removes only this record).
-- The deadline is taken from the server's clock, so every instance judges "late" alike.
-- Returns the deadline (epoch ms), or 0 when this correlation id is already in use.
local existing = redis.call('HMGET', KEYS[1], 'deadline', 'owner')
if existing[1] then
  if existing[2] == ARGV[4] then
    return tonumber(existing[1])  -- run twice by its owner (a retry after a lost connection)
  end
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local deadline = now_ms + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'deadline', deadline, 'reply_topic', ARGV[3], 'owner', ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]))
return deadline
