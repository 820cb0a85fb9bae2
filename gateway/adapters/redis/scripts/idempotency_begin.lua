-- Start a request under an idempotency key, or report what an earlier one with that key did.
-- KEYS[1] the record; ARGV[1] request fingerprint, ARGV[2] owner token, ARGV[3] in-flight TTL (ms).
-- Returns {"new"} | {"done", answer} | {"running"} | {"reused"}.
-- Run twice by one owner (the client retried after a lost connection), it answers "new" both times.
local record = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'answer', 'owner')
if not record[1] then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'state', 'running', 'owner', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'new'}
end
if record[1] ~= ARGV[1] then
  return {'reused'}
end
if record[2] == 'done' then
  return {'done', record[3]}
end
if record[4] == ARGV[2] then
  return {'new'}
end
return {'running'}
