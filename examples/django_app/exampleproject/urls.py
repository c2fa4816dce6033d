from django.urls import path

from . import views

urlpatterns = [
    path("square/<int:n>", views.square),
    path("hit/<str:name>", views.hit),
    path("put/<str:key>/<str:value>", views.put),
    path("boot", views.boot),
]
