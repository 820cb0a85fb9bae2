-- Store the answer of the request that owns the key (ARGV[3] = '' abandons it so a retry can run).
-- KEYS[1] the record; ARGV[1] owner token, ARGV[2] TTL (ms), ARGV[3] answer.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'state', 'done', 'answer', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
