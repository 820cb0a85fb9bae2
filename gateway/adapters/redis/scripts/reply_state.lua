-- Where a request stands. KEYS[1] pending hash, KEYS[2] reply.
-- Returns {'replied', blob}, {'pending', deadline}, {'timed_out', deadline} or {'unknown'}.
local reply = redis.call('GET', KEYS[2])
if reply then
  return {'replied', reply}
end
local deadline = redis.call('HGET', KEYS[1], 'deadline')
if not deadline then
  return {'unknown'}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if now_ms > tonumber(deadline) then
  return {'timed_out', deadline}
end
return {'pending', deadline}
