/**
 * A small wrapper around the generated {@code dev.kpg.v1} stubs of the Kafka Pattern Gateway:
 * {@link io.kpg.client.KpgClient} (one channel, a blocking stub per service) and
 * {@link io.kpg.client.KpgErrors} (the contract's {@code google.rpc.ErrorInfo} reason and metadata).
 */
package io.kpg.client;
