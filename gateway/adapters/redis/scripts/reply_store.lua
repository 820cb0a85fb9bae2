-- Keep a reply for its request and wake the waiting instance. KEYS[1] pending hash, KEYS[2] reply;
-- ARGV[1] reply blob, ARGV[2] reply TTL (ms), ARGV[3] notification channel, ARGV[4] the notification
-- (correlation id, newline, reply blob: the waiting instance needs no second round trip).
-- Returns 'stored', 'late' (past the request's deadline: dropped), 'unknown' (no such request, or expired)
-- or 'duplicate' (a reply is already kept).
local deadline = redis.call('HGET', KEYS[1], 'deadline')
if not deadline then
  return 'unknown'
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if now_ms > tonumber(deadline) then
  return 'late'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'duplicate'
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 'stored'
