-- Withdraw a request whose sending failed, so its correlation id may be used again at once.
-- KEYS[1] pending hash, KEYS[2] reply; ARGV[1] the owner token reply_expect recorded.
-- Only the record with that owner is removed (with a reply kept for it): another request that took the
-- correlation id after ours expired is left alone. Returns 1 when removed, 0 when not ours (or gone).
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
