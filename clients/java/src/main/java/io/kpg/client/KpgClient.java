package io.kpg.client;

import dev.kpg.v1.DeadLettersGrpc;
import dev.kpg.v1.EventStoreGrpc;
import dev.kpg.v1.ReadModelsGrpc;
import dev.kpg.v1.RequestReplyGrpc;
import dev.kpg.v1.SagasGrpc;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import java.util.concurrent.TimeUnit;

/**
 * One plaintext channel to a Kafka Pattern Gateway and a blocking stub per service.
 *
 * <pre>{@code
 * try (KpgClient kpg = KpgClient.connect("127.0.0.1:50051")) {
 *     AppendEventsResponse appended = kpg.events().withDeadlineAfter(30, TimeUnit.SECONDS).appendEvents(request);
 * }
 * }</pre>
 *
 * <p>Stubs are immutable: {@code withDeadlineAfter} returns a copy for one call. For asynchronous or
 * streaming-with-callbacks use, build {@code EventStoreGrpc.newStub(kpg.channel())} and the like.
 */
public final class KpgClient implements AutoCloseable {
    private final ManagedChannel channel;
    private final EventStoreGrpc.EventStoreBlockingStub events;
    private final ReadModelsGrpc.ReadModelsBlockingStub readModels;
    private final SagasGrpc.SagasBlockingStub sagas;
    private final RequestReplyGrpc.RequestReplyBlockingStub requests;
    private final DeadLettersGrpc.DeadLettersBlockingStub deadLetters;

    /** Wraps a channel built elsewhere (TLS, interceptors, ...); {@link #close()} shuts it down. */
    public KpgClient(ManagedChannel channel) {
        this.channel = channel;
        this.events = EventStoreGrpc.newBlockingStub(channel);
        this.readModels = ReadModelsGrpc.newBlockingStub(channel);
        this.sagas = SagasGrpc.newBlockingStub(channel);
        this.requests = RequestReplyGrpc.newBlockingStub(channel);
        this.deadLetters = DeadLettersGrpc.newBlockingStub(channel);
    }

    /**
     * Opens a plaintext channel to {@code target}.
     *
     * @param target the gateway's gRPC address, {@code host:port} (or any gRPC target URI)
     */
    public static KpgClient connect(String target) {
        return new KpgClient(ManagedChannelBuilder.forTarget(target).usePlaintext().build());
    }

    /** The underlying channel, for async stubs or custom calls. */
    public ManagedChannel channel() {
        return channel;
    }

    /** {@code kpg.v1.EventStore}: append, read and subscribe to event streams. */
    public EventStoreGrpc.EventStoreBlockingStub events() {
        return events;
    }

    /** {@code kpg.v1.ReadModels}: documents projected from a category's events. */
    public ReadModelsGrpc.ReadModelsBlockingStub readModels() {
        return readModels;
    }

    /** {@code kpg.v1.Sagas}: start, inspect and watch orchestrated sagas. */
    public SagasGrpc.SagasBlockingStub sagas() {
        return sagas;
    }

    /** {@code kpg.v1.RequestReply}: request-reply over Kafka. */
    public RequestReplyGrpc.RequestReplyBlockingStub requests() {
        return requests;
    }

    /** {@code kpg.v1.DeadLetters}: inspect, reprocess and discard dead letters. */
    public DeadLettersGrpc.DeadLettersBlockingStub deadLetters() {
        return deadLetters;
    }

    /** Shuts the channel down, waiting up to 5 s for calls in flight, then cancels what is left. */
    @Override
    public void close() {
        channel.shutdown();
        try {
            if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
                channel.shutdownNow();
            }
        } catch (InterruptedException e) {
            channel.shutdownNow();
            Thread.currentThread().interrupt();
        }
    }
}
